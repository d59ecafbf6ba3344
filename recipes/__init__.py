"""Recipe LightningModules, DataModules and configs for the ``memcomp`` command."""
