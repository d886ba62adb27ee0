"""Grounding answers in the user's own documents: embeddings, parsing, chunking, the LanceDB
store, retrieval and retrieval-augmented answers. Nothing here talks to the network."""
