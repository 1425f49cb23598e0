"""The demo models and their data: the catalog of models by name (models.toml), SmolMoE (a real-
weight MoE upcycled from SmolLM2), tiny synthetic MoE files for tests, the local text corpus and
perplexity."""
