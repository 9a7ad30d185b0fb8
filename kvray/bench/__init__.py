"""``kvray bench``'s one cell: built from plain arguments, checked whole before any model loads, measured in this
process through the runner (kvray/runner/) and written to the dataset."""
