"""Hydra/argparse entry points of the analysis scripts in scripts/."""
