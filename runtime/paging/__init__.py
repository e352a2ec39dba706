"""Storage paging: run a model whose weights exceed the memory budget by streaming decoder layers
from the bundle's weights file (see docs/paging.md)."""
