"""How to reach a cluster: `ray job submit` runtime env, local Ray head scripts, KubeRay manifest."""
