"""The data around a training step: the dataset pulled in (:mod:`sdk.data.pull`), the outputs pushed out
(:mod:`sdk.data.push`, :mod:`sdk.data.outputs`), and the DataLoader's exact position (:mod:`sdk.data.loader`).
"""
