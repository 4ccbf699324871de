"""One module per stage; asset checks live beside their assets."""
