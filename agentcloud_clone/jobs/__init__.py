"""Work done by RQ workers: session turns, the cancel watcher, and the reaper of lost turns."""
