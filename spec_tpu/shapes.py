"""Shape notation used in every signature and comment of the library.

  b  batch (rows)                      t  new tokens in one forward call
  s  cache slots of a layer            l  layers
  d  d_model                           f  feed-forward hidden size
  h  query heads                       k  key/value heads (h = k * g)
  g  query heads per key/value head    e  head_dim
  v  vocabulary (embedding rows)       n  draft tokens proposed per round (K)
  w  RG-LRU width (recurrent layers)   c  Conv1D taps of a recurrent layer (its state keeps c-1)
  i  width of one RG-LRU gate block (w = h * i)

Images (models/vision/): u images of H x W x 3 pixels (capitals: not the letters above),
  p  patches of an image               a  the image encoder's width (its MLP: f)
  j  soft tokens of an image           m  soft tokens of a prompt row (its images' j each)

Arrays are named `<thing>_<shape>` where the shape is not obvious, e.g.
`logits_btv`, `cache_k_bske`.
"""
