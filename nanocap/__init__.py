"""nanocap: semi-supervised CLIP-prefix image captioning (Jin, arXiv 2306.15111), small and readable."""
