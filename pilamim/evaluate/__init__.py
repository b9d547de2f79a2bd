"""Evaluation of a pretrained encoder: linear probe, kNN and fine-tuning (framework-free).

Import the submodules directly (``pilamim.evaluate.knn`` ...): the package itself imports
nothing, so the training loop's kNN monitor does not pull in the fine-tuning stack.
"""
