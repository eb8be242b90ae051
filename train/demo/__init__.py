"""The embedded default: ProCLIP end to end on a synthetic world, a teacher CLIP trained here and a real LLM."""
