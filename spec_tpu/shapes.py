"""Shape notation used in every signature and comment of the library.

  b  batch (rows)                      t  new tokens in one forward call
  s  cache slots of a layer            l  layers
  d  d_model                           f  feed-forward hidden size
  h  query heads                       k  key/value heads (h = k * g)
  g  query heads per key/value head    e  head_dim
  v  vocabulary (embedding rows)       n  draft tokens proposed per round (K)
  w  RG-LRU width (recurrent layers)   c  Conv1D taps of a recurrent layer (its state keeps c-1)
  i  width of one RG-LRU gate block (w = h * i)

Arrays are named `<thing>_<shape>` where the shape is not obvious, e.g.
`logits_btv`, `cache_k_bske`.
"""
