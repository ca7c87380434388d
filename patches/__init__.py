"""One module per architecture family; importing this package registers them all.

The generic entry is imported last: it serves any other model whose attention goes through
transformers' AttentionInterface.
"""

from . import bert, gpt2, gpt_neo, llama  # noqa: F401  (each registers its family)
from . import generic  # noqa: F401  (must stay last: it is the catch-all)
