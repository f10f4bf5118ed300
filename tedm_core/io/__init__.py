"""Reading and writing files: images, volumes, safe JSON/safetensors, atomic writes."""
