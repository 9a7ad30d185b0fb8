"""fig1–fig9 from the dataset alone (no Ray, no torch): one style, one module per figure family."""
