"""Exact k-nearest-neighbour search, shared by the k-NN protocol, few-shot and the trainer's
online monitor: the block top-k kernel (``topk``), the search itself with its torch and FAISS
backends, the vote and the classifier (``knn``), and the measured choice among GPU searches
(``gpu``)."""
