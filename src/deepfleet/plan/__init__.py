"""Pure planning: recipe schema, memory estimate, DeepSpeed config build and validation."""
