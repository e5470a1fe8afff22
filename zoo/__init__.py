"""The paper's experiments as LightningModules and DataModules, run through LightningCLI."""
