"""BioMed-VITAL as a DVC pipeline. Each stage's logic lives in one module here; see dvc.yaml."""
