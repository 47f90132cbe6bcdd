"""The shell around the core: observe, plan, guard, journal, execute, and the service that runs them."""
