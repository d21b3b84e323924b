// MQTT.js resuming a persistent session, as device code does: connect with clean: false,
// subscribe only when the broker says it has no session (CONNACK session present 0), and
// take what was queued meanwhile.
// Usage: node resume.mjs URL CLIENT_ID TOPIC PROTOCOL_VERSION WAIT_MS
// Prints `present true|false`, then one `message TOPIC PAYLOAD QOS` line per message received
// within WAIT_MS, then DONE; exits 1 with the reason on an error.
import mqtt from "mqtt";

const [url, clientId, topic, version, wait] = process.argv.slice(2);
const v5 = version === "5";
const opts = {
  clientId,
  clean: false,
  protocolVersion: v5 ? 5 : 4,
  connectTimeout: 20000,
  reconnectPeriod: 0,
  ...(v5 ? { properties: { sessionExpiryInterval: 3600 } } : {}),
};
const client = mqtt.connect(url, opts);
const fail = (why) => { console.error(`FAIL ${why}`); process.exit(1); };
const done = () => {
  console.log("DONE");
  // Closed without DISCONNECT's effect on the session: it stays, as a device's would.
  client.end(false, () => process.exit(0));
};
client.on("error", (e) => fail(`error ${e.message}`));
client.on("message", (t, payload, packet) => console.log(`message ${t} ${payload} ${packet.qos}`));
client.once("connect", (connack) => {
  console.log(`present ${connack.sessionPresent}`);
  if (connack.sessionPresent) {
    setTimeout(done, Number(wait));
    return;
  }
  client.subscribe(topic, { qos: 1 }, (err) => {
    if (err) fail(`subscribe ${err.message}`);
    setTimeout(done, Number(wait));
  });
});
