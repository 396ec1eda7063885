"""Loading and running bundles on this host through ExecuTorch's runtime."""
