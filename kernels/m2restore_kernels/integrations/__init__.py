"""Drop-ins: one call makes other projects' unchanged code run m2restore_kernels."""
