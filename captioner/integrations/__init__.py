"""Adapters that run the captioner inside other frameworks. Each one imports its framework only when used, so
`import captioner` never loads them (`captioner.integrations.ray_data`: batch captioning on Ray Data)."""
