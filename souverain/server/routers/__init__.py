"""One `APIRouter` per API family: chat (+ FIM), models, embeddings, files (+ fine-tuning
jobs), libraries, health (+ metrics). Handlers translate and delegate; `create_app` mounts
the routers."""
