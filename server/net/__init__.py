"""How nodes reach the coordinator and each other: the web app, signaling, links, WebRTC and the browser bundle."""
