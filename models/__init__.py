"""Build-time code: the torch BERT, data from installed packages, training, export, bundles."""
