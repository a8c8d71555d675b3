// What the publish and watch pages share: the token, a complete offer (no trickle ICE), the POST that
// opens a WHIP or WHEP session and the DELETE that ends it.
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const fragment = new URLSearchParams(location.hash.slice(1));  // (a fragment never reaches a server or its logs)

// The page's state, for people (#state) and for automation (window.aic.state).
function show(state, detail) {
  aic.state = state;
  $("state").textContent = state + (detail ? ": " + detail : "");
}

// A start that failed: say why, and end whatever it had opened.
async function failed(e, stop) {
  aic.error = String(e && e.message || e);
  show("error", aic.error);
  await stop();
}

function authHeaders(extra) {
  const t = $("token").value.trim();
  return Object.assign(t ? {Authorization: "Bearer " + t} : {}, extra || {});
}

function gathered(pc) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
    setTimeout(resolve, 3000);
  });
}

// POST the peer's complete offer to path (/whip/ID or /whep/ID); the session's URL once answered.
async function openSession(pc, path) {
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  const r = await fetch(path, {method: "POST", headers: authHeaders({"Content-Type": "application/sdp"}),
                               body: pc.localDescription.sdp});
  const body = await r.text();
  if (r.status !== 201) throw new Error("the edge answered " + r.status + ": " + body.trim());
  const resource = r.headers.get("Location");
  try {
    await pc.setRemoteDescription({type: "answer", sdp: body});
  } catch (e) {
    await closeSession(resource);  // (else the stream stays taken until the edge gives the session up)
    throw e;
  }
  return resource;
}

async function closeSession(resource) {
  if (!resource) return;
  // keepalive: the DELETE still goes out when the page is being closed or reloaded
  try { await fetch(resource, {method: "DELETE", headers: authHeaders(), keepalive: true}); } catch (e) {}
}
