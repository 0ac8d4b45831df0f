"""Text corpora, tokenizers and the Lightning data module that packs them into training blocks."""
from spikellm.data.calibration import calibration_samples
from spikellm.data.corpus import iter_documents, load_documents
from spikellm.data.datamodule import TextDataModule
from spikellm.data.tokenizer import Tokenizer, build_tokenizer

__all__ = ["calibration_samples", "TextDataModule", "Tokenizer", "build_tokenizer", "iter_documents", "load_documents"]
