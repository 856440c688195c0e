"""Models: loading from local directories, GGUF files and MLflow (`loading`), mapping each
supported architecture onto one anatomy (`architectures`), and tiny models built from configs
for tests (`tiny`)."""
