"""arborl.scaffold_adapters (see DESIGN.md section 1)."""
