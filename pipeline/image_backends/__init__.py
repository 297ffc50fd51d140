"""Image backends behind `pipeline.images.make_image_backend` (design §6).

- `core`: slots, jobs, the check-and-replace driver (`ImageMaker`), fallback, provenance;
- `checks`: decode / size / RGB checks and perceptual near-duplicate detection;
- `cache`: the file cache of generated images;
- `openai_api`, `diffusion`, `retrieve`: the generators; `clip`: CLIP embeddings.
The flagworld renderer lives in `pipeline.images`.
"""
