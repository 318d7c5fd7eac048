"""fico-toy: a small LLaVA-architecture model trained on a synthetic VQA task.

Random-weight models attend almost uniformly, so every reduction method looks alike on
them. The toy model's attention means something: it answers questions about generated
336 x 336 images whose answers need different kinds of visual information (see
:mod:`fico.toy.data`). Train it with ``python -m fico.toy.train``; the trained weights ship
in ``fico/toy/weights`` and load with ``from_pretrained``.
"""
