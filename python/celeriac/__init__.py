"""celeriac's Python half: the zygote and the pool children, embedded in the celeriac binary."""
