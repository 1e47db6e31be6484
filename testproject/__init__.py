"""testproject: a Django Channels chat served through crossws_channels."""
