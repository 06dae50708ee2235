"""arborl.learner (see DESIGN.md section 1)."""
