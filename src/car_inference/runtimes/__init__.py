"""External servers the engine reaches: discovery of the models OpenAI-compatible endpoints serve."""
