"""LightningModules of the models trained on the platform."""
