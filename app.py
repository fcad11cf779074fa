"""Placeholder until the page lands: prints the default model's answer."""
from library_store.base_models import load_base_model

if __name__ == "__main__":
    print(load_base_model().generate("What is the capital of France?"))
