"""Plain torch models: the DMF tower, the text tower and the fusion head. No Ray, no DeepSpeed."""
