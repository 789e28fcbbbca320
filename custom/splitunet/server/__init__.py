"""Server side of Split-U-Net: labels, decoder, loss and validation. Never imports the site side."""
