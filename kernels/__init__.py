"""arborl.kernels (see DESIGN.md section 1)."""
