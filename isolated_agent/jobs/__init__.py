"""Jobs: start a command suspended, contain its process tree, give it its view, wait for it."""
