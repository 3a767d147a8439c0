"""llmrpc services: tokenizer, scheduler, worker, and the llmrpc CLI."""
