"""Runtimes: what turns a padded batch of token ids into encoder states."""
