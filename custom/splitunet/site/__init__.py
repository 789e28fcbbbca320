"""Site side of Split-U-Net: one modality's data and encoder. Never imports the server side."""
