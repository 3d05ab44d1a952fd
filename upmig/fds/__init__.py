"""The kinds of fd a process can hold, one module each."""
