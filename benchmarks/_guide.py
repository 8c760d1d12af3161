"""The Hugging Face masked-language-modeling guide's own preprocessing, as written there, for the
benchmarks that measure against it (only the block size is a parameter)."""

from __future__ import annotations


def make_preprocess_function(tokenizer):
    def preprocess_function(examples):
        return tokenizer([" ".join(x) for x in examples["answers.text"]])

    return preprocess_function


def make_group_texts(block_size: int):
    def group_texts(examples):
        # Concatenate all texts.
        concatenated_examples = {k: sum(examples[k], []) for k in examples.keys()}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        # We drop the small remainder, we could add padding if the model supported it instead of this drop.
        if total_length >= block_size:
            total_length = (total_length // block_size) * block_size
        # Split by chunks of block_size.
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated_examples.items()
        }
        return result

    return group_texts
