"""The main job: a small tensor- and expert-parallel decoder run end to end with llmcomm."""
