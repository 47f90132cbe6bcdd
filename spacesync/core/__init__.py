"""The pure core: plain functions from a snapshot and a policy to a plan. No I/O here."""
