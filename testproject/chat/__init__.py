"""The chat app: rooms over WebSockets, a sync announce view and a worker-channel job."""
