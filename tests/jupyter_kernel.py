"""Execute a notebook's cells through a real Jupyter server on loopback, over its REST and kernel websocket API,
the way JupyterLab does (used by the reproduction tests)."""
import asyncio, datetime, json, os, secrets, socket, subprocess, sys, time, uuid
from pathlib import Path

import requests


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


class JupyterServer:
    "A `jupyter server` subprocess bound to 127.0.0.1 with a random token; a context manager."
    def __init__(self, root_dir, timeout=60):
        self.root, self.timeout = Path(root_dir), timeout
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.url = f'http://127.0.0.1:{self.port}'

    def __enter__(self):
        cmd = [sys.executable, '-m', 'jupyter_server', '--no-browser', f'--ServerApp.ip=127.0.0.1',
               f'--ServerApp.port={self.port}', f'--IdentityProvider.token={self.token}',
               f'--ServerApp.root_dir={self.root}', '--ServerApp.port_retries=0', '--allow-root']
        self.log = open(self.root / '.jupyter_server_test.log', 'w')
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < self.timeout:
            try:
                if self.get('/api/status').status_code == 200: return self
            except requests.ConnectionError: pass
            if self.proc.poll() is not None: break
            time.sleep(0.5)
        out = (self.root / ".jupyter_server_test.log").read_text()[-2000:]
        self.__exit__(); raise RuntimeError('jupyter server did not start:\n' + out)

    def __exit__(self, *a):
        self.proc.terminate()
        try: self.proc.wait(20)
        except subprocess.TimeoutExpired: self.proc.kill()
        self.log.close()
        (self.root / '.jupyter_server_test.log').unlink(missing_ok=True)

    def _h(self): return {'Authorization': f'token {self.token}'}
    def get(self, path): return requests.get(self.url + path, headers=self._h(), timeout=10)
    def post(self, path, body): return requests.post(self.url + path, json=body, headers=self._h(), timeout=60)
    def delete(self, path): return requests.delete(self.url + path, headers=self._h(), timeout=30)

    def run_cells(self, nb_path, cells, timeout=900):
        """Start a kernel session for `nb_path` (relative to the root), execute `cells` (code strings) in order
        over the kernel websocket, and return the list of outputs (text) per cell. Raises on the first error."""
        r = self.post('/api/sessions', {'path': str(nb_path), 'type': 'notebook', 'name': Path(nb_path).name,
                                        'kernel': {'name': 'python3'}})
        r.raise_for_status(); sess = r.json()
        try:
            return asyncio.run(self._execute(sess['kernel']['id'], cells, timeout))
        finally:
            self.delete(f"/api/sessions/{sess['id']}")

    async def _execute(self, kernel_id, cells, timeout):
        from tornado.websocket import websocket_connect
        from tornado.httpclient import HTTPRequest
        ws_url = f'ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}'
        conn = await websocket_connect(HTTPRequest(ws_url, headers=self._h()))
        session, outputs = uuid.uuid4().hex, []
        try:
            for code in cells:
                msg_id = uuid.uuid4().hex
                conn.write_message(json.dumps({
                    'header': {'msg_id': msg_id, 'msg_type': 'execute_request', 'session': session,
                               'username': 'test', 'version': '5.3',
                               'date': datetime.datetime.now(datetime.timezone.utc).isoformat()},
                    'parent_header': {}, 'metadata': {}, 'channel': 'shell', 'buffers': [],
                    'content': {'code': code, 'silent': False, 'store_history': True, 'user_expressions': {},
                                'allow_stdin': False, 'stop_on_error': True}}))
                text, deadline = [], time.time() + timeout
                while True:
                    raw = await asyncio.wait_for(conn.read_message(), max(1, deadline - time.time()))
                    if raw is None: raise RuntimeError('kernel websocket closed')
                    msg = json.loads(raw)
                    if msg.get('parent_header', {}).get('msg_id') != msg_id: continue
                    t, c = msg['msg_type'], msg['content']
                    if t == 'stream': text.append(c['text'])
                    elif t in ('execute_result', 'display_data'): text.append(c['data'].get('text/plain', ''))
                    elif t == 'error':
                        raise RuntimeError(f"cell failed: {c['ename']}: {c['evalue']}\n" + '\n'.join(c['traceback'])[-3000:])
                    elif t == 'execute_reply' and msg['channel'] == 'shell':
                        if c['status'] != 'ok': raise RuntimeError(f"cell failed: {c.get('ename')}: {c.get('evalue')}")
                        break
                outputs.append(''.join(text))
        finally:
            conn.close()
        return outputs
